"""Pure state of the NLB: which module instances exist and how to pick one. No I/O here."""
