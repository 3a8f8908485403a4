"""Running many independent jobs (experts, dense baselines) locally or on a Ray cluster."""
