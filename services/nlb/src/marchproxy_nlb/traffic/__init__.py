"""The NLB data plane: listeners, sniffing, routing, blue/green splits, rate limits, relay.

Pure rules live in ``routing``, ``balancer``, ``bluegreen`` and ``limits``; sockets live in
``listener``; ``plane.DataPlane`` wires them and answers the data-path RPCs.
"""
