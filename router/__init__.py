"""The control plane: model repository, worker reports, and the routing table."""
