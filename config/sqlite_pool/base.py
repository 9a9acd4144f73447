"""SQLite whose connections are kept and handed to the next thread: the embedded default's database.

Django's ASGI handler runs each request's sync code in a thread of its own, and a Django
connection belongs to its thread: every request opened a new SQLite connection. Opening one costs
its PRAGMAs, Django's ~30 SQL functions and, at its first statement, the parse of the whole
schema: 1.4 ms of the 1.7 ms that looking an API key up took on the embedded default. Here a
closed connection goes back to a small per-process list instead, and the next connection to be
opened is taken from it. SQLite allows a connection to move between threads when one thread at a
time uses it (Django opens them with ``check_same_thread=False``): a connection is in the list only
while nobody holds it, outside any transaction.

The embedded default sets ``CONN_MAX_AGE`` to 0 with it, so that a request's connection is given
back when the request ends, and a worker thread's after each query.
"""

import os
import threading

from django.db.backends.sqlite3 import base

IDLE_CONNECTIONS = 16  # kept per database file and process; more are closed for good


class DatabaseWrapper(base.DatabaseWrapper):
    _idle: dict[str, list] = {}
    _idle_pid = os.getpid()
    _idle_lock = threading.Lock()

    def _pooled(self) -> bool:
        return not self.is_in_memory_db()

    @classmethod
    def _idle_list(cls, name: str) -> list:
        # A forked child must not use its parent's connections (SQLite forbids it): it starts afresh.
        if cls._idle_pid != os.getpid():
            cls._idle, cls._idle_pid = {}, os.getpid()
        return cls._idle.setdefault(name, [])

    def get_new_connection(self, conn_params):
        if self._pooled():
            with self._idle_lock:
                idle = self._idle_list(str(self.settings_dict["NAME"]))
                if idle:
                    return idle.pop()
        return super().get_new_connection(conn_params)

    def _close(self):
        connection = self.connection
        # Closed inside ``atomic`` (an error mid-transaction): this wrapper keeps using the
        # connection until the block ends, so it cannot be handed on.
        if connection is None or not self._pooled() or self.in_atomic_block:
            return super()._close()
        with self.wrap_database_errors:
            if connection.in_transaction:
                connection.rollback()
        with self._idle_lock:
            idle = self._idle_list(str(self.settings_dict["NAME"]))
            if len(idle) < IDLE_CONNECTIONS:
                idle.append(connection)
                return None
        return super()._close()
