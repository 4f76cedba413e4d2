"""The web listener (issue 14): the socket's API, `/metrics` and (to come) the dashboard over HTTP.

`guard` decides, from a request's method, path and headers alone, whether it may be answered
(Host, Origin, the token; pure, no I/O); `app` is the Starlette app: the guard as middleware in
front of one route table (`routes`), which the dashboard extends with its pages; `listener` serves
it on the configured address inside the daemon's event loop. The API is the socket's own route
table (`service/server.py`'s `ApiServer.dispatch`), reached under `/api/`: one table, two doors.
Nothing here reads configuration: the daemon hands in the address, the token and the callables.
"""
