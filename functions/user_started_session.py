"""Runs after a session started (non-blocking): here it only logs."""


def handle_event(event, context):
    context.log("session", event.session_id, "started for", event.user["name"])
