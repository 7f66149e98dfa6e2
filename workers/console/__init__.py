"""The operations console: a small web application for support and operations staff, who
answer "why is this student still waiting?" without SQL (`make console`,
`python -m workers console`).

It is Starlette with Jinja2 templates, served by uvicorn on 127.0.0.1:8080 by default, and it
reads the database only as `kc_operator` (its connections SET ROLE kc_operator): the views,
and the operator functions for its actions. Pages: the overview (the last 24 hours' funnel,
each stage's backlog and latency, a chart drawn server-side as SVG), the purchases waiting
for a trainer by reason, failed jobs and rejected payments, and a search whose trace shows
a purchase's timeline in the student's time zone. Actions (replay, retry, assign,
reschedule) need a person signed in with their own operator token (`python -m workers
operator add <name>`): the session lives in the database, every form carries a CSRF token,
and the operator functions record `console:<name>` as the actor from the session itself. On
loopback reading needs no sign-in; beyond loopback every page does.

`app.py` builds the application and its gate, `access.py` holds the cookie, sessions, CSRF,
throttle and body rules, `pages.py` and `actions.py` answer its requests, `charts.py` draws
the chart, `serve.py` checks the host and the database and runs uvicorn.
"""
