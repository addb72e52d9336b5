# The compiled functions of _heads.pyx, declared here so that the
# Exchange's core (hubcore/gateway/_exchange.pyx) calls them in C.

cpdef bytes request_head(bytes method, bytes target, bytes base_path, bytes host_line, bytes auth_line,
                         list headers, control, Py_ssize_t body_size)
cpdef bytes response_head(int status, list headers, framing, content_length, bint keep_alive, str request_id,
                          list budget=*)
cpdef response_framing(int status, content_length, bint client_http11)
cpdef bint keeps_alive(framing, bint client_keep_alive)
cpdef route_for(bytes path, list headers=*)
cpdef session_from_headers(list headers)
cpdef leading_model(bytes body_start)
cpdef str model_class(model)
