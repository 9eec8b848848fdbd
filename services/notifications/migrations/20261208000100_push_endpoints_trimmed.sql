-- Endpoints were kept as sent, so one with spaces around it was a second device of the same
-- browser (and pushed twice). Registration now keeps the URL as parsed; rows from before are
-- trimmed the same way, and where that makes two rows one endpoint the newest registration stays
-- (the browser belongs to whoever subscribed last), the others going with their pushes.
DELETE FROM push_subscriptions s
USING (
    SELECT id,
           row_number() OVER (
               PARTITION BY regexp_replace(endpoint, '^[[:cntrl:] ]+|[[:cntrl:] ]+$', '', 'g')
               ORDER BY created_at DESC, id DESC
           ) AS newest_first
    FROM push_subscriptions
) ranked
WHERE s.id = ranked.id AND ranked.newest_first > 1;

UPDATE push_subscriptions
SET endpoint = regexp_replace(endpoint, '^[[:cntrl:] ]+|[[:cntrl:] ]+$', '', 'g')
WHERE endpoint ~ '^[[:cntrl:] ]|[[:cntrl:] ]$';
