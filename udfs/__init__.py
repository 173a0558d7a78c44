"""streamlift logic in plain Python: no Flink import anywhere in this package."""
