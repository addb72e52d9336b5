# The request path's UsageEvent maker, a C call from gateway/_exchange.pyx.
cpdef object new_event(tuple values)
