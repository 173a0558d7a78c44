"""The Flink jobs a platform team submits (features, outcomes, learner) and their shared wiring:
configuration, the Flink environment, sinks, sources (Kafka), data-quality step, progress."""
