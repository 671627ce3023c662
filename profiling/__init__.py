"""What the suite measures with: markers, launch counts, throughput, baselines, the report."""
