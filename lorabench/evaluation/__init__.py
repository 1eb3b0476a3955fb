"""Task metrics: GLUE classification/regression, GSM8K answer matching, E2E data-to-text scores."""
