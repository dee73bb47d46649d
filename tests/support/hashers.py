"""Tests only: password hashing that costs microseconds, not half a second."""

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    """PBKDF2-SHA256 with 1,000 iterations instead of Django's 1,000,000: every user a test
    creates cost 0.5 s of hashing, minutes over the suite. The algorithm name is the stock
    one and the iteration count is part of each hash, so the real Daphne and Celery
    processes the tests start (with the stock hashers) verify these hashes as they are."""

    iterations = 1000
