"""iptables data plane: pure renderer (names, render) and the applier around it."""
