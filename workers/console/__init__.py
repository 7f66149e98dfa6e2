"""The operations console: a small web application for support and operations staff, who
answer "why is this student still waiting?" without SQL (`make console`,
`python -m workers console`).

It is Starlette with Jinja2 templates, served by uvicorn on 127.0.0.1:8080 by default, and it
reads the database only as `kc_operator` (its connections SET ROLE kc_operator): the views,
and the operator functions for its actions. Pages: the overview (the last 24 hours' funnel,
each stage's backlog and latency, a chart drawn server-side as SVG), the purchases waiting
for a trainer by reason, failed jobs and rejected payments, and a search whose trace shows
a purchase's timeline in the student's time zone. Actions (replay, retry, assign,
reschedule) need KC_CONSOLE_TOKEN: a person signs in with it and a name, every form carries
a CSRF token, and stage_history records `console:<name>` as the actor. Without the token the
console is read-only and listens on loopback only.

`app.py` builds the application, `pages.py` and `actions.py` answer its requests,
`charts.py` draws the chart, `serve.py` checks the host and the database and runs uvicorn.
"""
