"""Evaluation: every photo -> vector method behind one interface, the metrics, and the reports."""
