"""The WireGuard overlay: donors behind NAT join the fabric through the head.

Ray needs every node to reach every other node; a donor behind a home NAT accepts no
inbound connection. So each donor dials the head's WireGuard port (UDP, outbound only) and
gets an address on the overlay; Ray reaches a donor that the head could not reach at its own
address at its overlay address instead, relayed through the head (hub and spoke). Donors
the head reaches directly stay *direct* for Ray, and their tunnel only lets them reach the
relayed ones.

- ``addresses``: the overlay network and address allocation (pure).
- ``peers``: WireGuard peer configuration as ``wg set`` arguments, ``wg show`` parsing (pure).
- ``acl``: nftables rules that let only Ray's and dgpt's ports across the overlay (pure).
- ``wireguard``: one interface run by ``wireguard-go``; the only module that runs commands.
- ``hub``: the head's interface (its supervisor brings it up and down).
- ``coordinator``: the head's grants and revocations, stored in SQLite.
- ``endpoint``: a donor's key, interface and ACL.
"""
