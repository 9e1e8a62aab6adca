"""fleetlet-shim: the virtual kubelet. One process serves many cars: a Node and a Lease per connected car,
pods bound to those Nodes dispatched over the car link, pod status and telemetry mirrored back.
"""
