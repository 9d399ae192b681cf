"""The one-machine consortium demo (`exchange demo`): coordinator, SuperLink and three
hospital nodes on loopback, one study from submission to payout, then an offline audit."""
