"""The network: hlb-gpt v0.4.1, its fw/bw masks, the two tasks and their loss (no training state)."""
