"""ccied.discovery: mDNS advertise and browse, neighbour table, liveness.

A leaf package: it never imports ccied.peer. Built by the cluster issue.
"""
