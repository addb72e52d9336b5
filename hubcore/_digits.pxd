# Writing a number's decimal digits into a C buffer, for the compiled lines
# the request path writes (ops/_access.pyx: the access line's counts and
# times; gateway/_heads.pyx: the content-length line), where snprintf
# parsed its format on every call.

cdef inline int write_decimal(char* end, unsigned long long u) noexcept:
    """Write `u` in decimal just before `end`; return how many digits."""
    cdef int n = 0
    while True:
        n += 1
        end[-n] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            return n
