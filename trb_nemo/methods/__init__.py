"""The paper's Table 1: the method table, the behavior policies and the schedules. Needs
neither the config nor Megatron (a config error must not load torch)."""
