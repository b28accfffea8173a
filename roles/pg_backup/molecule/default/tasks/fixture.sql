-- Small application data set for the pg_backup / pg_restore scenarios (not the fixture app).
CREATE ROLE molecule_app LOGIN;
CREATE ROLE molecule_reader LOGIN;
CREATE DATABASE molecule_app OWNER molecule_app TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8';
REVOKE ALL ON DATABASE molecule_app FROM PUBLIC;
GRANT CONNECT ON DATABASE molecule_app TO molecule_reader;
\connect molecule_app
SET ROLE molecule_app;
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, created timestamptz NOT NULL);
INSERT INTO customers
SELECT g, 'customer ' || g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'c' || g || '@example.test' END,
       timestamptz '2024-01-01 00:00+00' + g * interval '1 hour'
  FROM generate_series(1, 5000) g;
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers, amount numeric(12, 2),
                     status text NOT NULL, placed timestamptz NOT NULL, payload jsonb);
INSERT INTO orders (customer_id, amount, status, placed, payload)
SELECT g % 5000 + 1, (g % 1000) * 1.37, (ARRAY['new', 'paid', 'shipped'])[g % 3 + 1],
       timestamptz '2024-06-01 00:00+00' + g * interval '1 minute', jsonb_build_object('n', g, 'tag', md5(g::text))
  FROM generate_series(1, 150000) g;
CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE TABLE order_notes (id serial PRIMARY KEY, order_id bigint REFERENCES orders, note text);
INSERT INTO order_notes (order_id, note) SELECT g * 7, repeat('note ', g % 20) FROM generate_series(1, 20000) g;
CREATE TABLE django_migrations (id serial PRIMARY KEY, app varchar(255) NOT NULL, name varchar(255) NOT NULL,
                                applied timestamptz NOT NULL);
INSERT INTO django_migrations (app, name, applied) VALUES
  ('contenttypes', '0001_initial', '2024-01-01 00:00+00'),
  ('shop', '0001_initial', '2024-01-02 00:00+00'),
  ('shop', '0002_orders', '2024-02-01 00:00+00');
GRANT SELECT ON orders TO molecule_reader;
RESET ROLE;
