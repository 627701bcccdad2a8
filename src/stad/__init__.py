"""stad: student-teacher anomaly detection benchmark framework."""

__version__ = "0.1.0"
