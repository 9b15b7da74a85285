"""chatfn's server: the HTTP admin API, the hook API and the WebSocket session endpoint
(FastAPI on uvicorn) over the runtime core. ``chatfn serve`` runs it."""
