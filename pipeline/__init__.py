"""pipeline: shard reading/decoding and the Apache Beam embedding + anomaly-scoring pipeline."""
