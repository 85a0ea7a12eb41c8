#!/bin/bash
# WAL pages per notification on SQLite: 50,000 notifications inserted 1,000 to a transaction
# (queued), claimed 250 to one (processing) and marked sent 500 to one, against a schema
# migrated by the given herald binary, then SQL if given (an index to try). Usage:
# writecost.sh HERALD DBFILE [SQL]
set -e
herald=$1; db=$2
rm -f "$db" "$db-wal" "$db-shm"
HERALD_DATABASE__URL="sqlite://$db?mode=rwc" "$herald" migrate > /dev/null 2>&1
[ -n "$3" ] && sqlite3 "$db" "$3"
{
echo "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; PRAGMA synchronous=NORMAL;"
for b in $(seq 0 49); do
  echo "BEGIN; WITH RECURSIVE n(i) AS (SELECT $((b*1000+1)) UNION ALL SELECT i+1 FROM n WHERE i < $((b*1000+1000)))
  INSERT INTO notifications (id, customer_id, recipient_key, contacts, category, channels, content, status, created_at, updated_at)
  SELECT printf('%08x-0000-7000-8000-%012x', i, i), CASE WHEN i % 5 < 3 THEN 'customer-' || (i % 5000) END,
    CASE WHEN i % 5 < 3 THEN 'customer-' || (i % 5000) ELSE 'user' || (i % 5000) || '@example.com' END,
    '{}', 'transactional', '[\"email\"]', '{\"subject\":\"Hello\"}', 'queued', '2026-12-07 10:00:00+00:00', '2026-12-07 10:00:00+00:00' FROM n; COMMIT;"
  for c in 0 1 2 3; do lo=$((b*1000+c*250+1)); hi=$((lo+249));
    echo "BEGIN; UPDATE notifications SET status='processing', updated_at='2026-12-07 10:00:01+00:00' WHERE id >= printf('%08x-0000-7000-8000-%012x', $lo, $lo) AND id <= printf('%08x-0000-7000-8000-%012x', $hi, $hi); COMMIT;"
  done
  for c in 0 1; do lo=$((b*1000+c*500+1)); hi=$((lo+499));
    echo "BEGIN; UPDATE notifications SET status='sent', final_channel='email', sent_at='2026-12-07 10:00:02+00:00', updated_at='2026-12-07 10:00:02+00:00' WHERE id >= printf('%08x-0000-7000-8000-%012x', $lo, $lo) AND id <= printf('%08x-0000-7000-8000-%012x', $hi, $hi); COMMIT;"
  done
done
echo ".shell stat -c %s $db-wal > /tmp/writecost-wal-$$"
} > /tmp/writecost-$$.sql
start=$(date +%s.%N)
sqlite3 "$db" < /tmp/writecost-$$.sql > /dev/null
end=$(date +%s.%N)
wal=$(cat /tmp/writecost-wal-$$)
echo "wal bytes $wal, pages/notification $(echo "scale=3; ($wal-32)/(4096+24)/50000" | bc), seconds $(echo "$end-$start" | bc)"
rm -f /tmp/writecost-$$.sql
