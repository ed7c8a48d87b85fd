#!/usr/bin/env python3
"""The client-side Fernet -> AES-GCM migration, the way applications do it
today without manna_crypt: read a batch by keyset pagination, decrypt with
cryptography's Fernet, encrypt with AESGCM into the manna_crypt version-1
envelope (key id 0: a raw key held by the client), write the batch back with
one UPDATE ... FROM unnest(...), commit per batch.

Used by scripts/bench_migrate.sh as the baseline. Keys come from the
environment (BENCH_FERNET_KEY, BENCH_RAW_KEY_HEX), never from argv.

    bench_client_migrate.py DSN TABLE [BATCH]
prints the elapsed seconds and the rows converted.
"""

import base64
import os
import sys
import time

import psycopg
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def main():
    dsn, table = sys.argv[1], sys.argv[2]
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    fernet = Fernet(os.environ["BENCH_FERNET_KEY"].encode())
    aead = AESGCM(bytes.fromhex(os.environ["BENCH_RAW_KEY_HEX"]))
    header = bytes([1, 0, 0, 0, 0])  # version 1, key id 0 (raw key)
    t0 = time.perf_counter()
    done = 0
    last = -1
    with psycopg.connect(dsn) as conn:
        while True:
            rows = conn.execute(
                f"SELECT id, tok FROM {table} WHERE id > %s ORDER BY id LIMIT %s", (last, batch)
            ).fetchall()
            if not rows:
                break
            ids, news = [], []
            for i, tok in rows:
                pt = fernet.decrypt(tok.encode())
                nonce = os.urandom(12)
                env = header + nonce + aead.encrypt(nonce, pt, header)
                ids.append(i)
                news.append("mc1:" + base64.b64encode(env).decode())
            conn.execute(
                f"UPDATE {table} AS t SET tok = v.new FROM unnest(%s::int[], %s::text[]) AS v(id, new) WHERE t.id = v.id",
                (ids, news),
            )
            conn.commit()
            done += len(rows)
            last = rows[-1][0]
    print(f"{time.perf_counter() - t0:.3f} {done}")


if __name__ == "__main__":
    main()
