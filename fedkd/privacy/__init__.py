"""Privacy mechanisms and accountants (RQM, Gaussian DP-FedAvg, DP-SGD helpers)."""
