#!/usr/bin/env python3
"""Times the dashboard's and the API's listings on a SQLite file filled by fill.sql (best of 7, warm
cache), with their plans. Usage: measure_sqlite.py FILE old|new (old: the feed's single OR
condition; new: its two halves)."""
import sqlite3, sys, time

COLS = ("id, created_at, status, final_channel, channels, category, customer_id, recipient_key, "
        "status_reason, substr(coalesce(content ->> 'subject', content ->> 'text'), 1, 80) AS subject")
OLD_FEED = (f"SELECT {COLS} FROM notifications WHERE customer_id = ? OR (customer_id IS NULL AND "
            "recipient_key = ?) ORDER BY id DESC LIMIT 100")
NEW_FEED = (f"SELECT * FROM (SELECT {COLS} FROM notifications WHERE customer_id = ? ORDER BY id DESC LIMIT 100) "
            f"AS by_customer UNION ALL SELECT * FROM (SELECT {COLS} FROM notifications WHERE customer_id IS NULL "
            "AND recipient_key = ? ORDER BY id DESC LIMIT 100) AS by_contact ORDER BY id DESC LIMIT 100")
QUERIES = {
    "feed, customer with no rows": ("feed", ("customer-19999",) * 2),
    "feed, inline contact (6 rows)": ("feed", ("user4@example.com",) * 2),
    "feed, customer (15 rows)": ("feed", ("customer-2",) * 2),
    "/scheduled page (51)": ("SELECT id, scheduled_at, category, customer_id, recipient_key, channels FROM "
                             "notifications WHERE status = 'scheduled' ORDER BY scheduled_at, id LIMIT 51", ()),
    "queued listing (50)": ("SELECT * FROM notifications WHERE status = 'queued' ORDER BY id DESC LIMIT 50", ()),
    "scheduled listing (51)": ("SELECT * FROM notifications WHERE status = 'scheduled' ORDER BY id DESC LIMIT 51",
                               ()),
}
db = sqlite3.connect(sys.argv[1])
feed = NEW_FEED if sys.argv[2] == "new" else OLD_FEED
for name, (sql, args) in QUERIES.items():
    sql = feed if sql == "feed" else sql
    best = min(timed for timed in (
        (lambda t0: (db.execute(sql, args).fetchall(), time.perf_counter() - t0)[1])(time.perf_counter())
        for _ in range(7)))
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args))
    print(f"{name:32} {best * 1000:8.2f} ms   {plan}")
