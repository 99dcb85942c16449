"""Integrations with serving frameworks (optional extras; nothing here is imported by the core).

    ray_serve   many replicas on a Ray cluster, each request routed to a replica that holds
                its adapter (Ray Serve model multiplexing): `pip install 'loraplex[ray]'`
"""
