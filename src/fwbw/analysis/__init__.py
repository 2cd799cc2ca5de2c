"""What a sweep shows: the study's metrics with intervals, figures and the report."""
