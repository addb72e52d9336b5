"""The one exception the streaming meter raises, importable by both of its twins.

Kept apart from `errors.py` so that the compiled meter imports nothing heavier.
"""


class MeterError(ValueError):
    """The meter was used wrongly (bad format code, feed after close).

    Odd bytes from a vendor never raise: the meter counts them as malformed
    and keeps metering the rest of the stream.
    """
