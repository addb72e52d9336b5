"""What a request cost: the SSE meter, prices, the usage row and its writer, reports."""
