"""Many runs: configs built from presets, files and flags; sweeps over a grid; the results table."""
