"""Evaluation of a byteified model against its source: bits per byte, boundaries, benchmark tasks,
the character suite, reports and the `show` view."""
