"""Seeded synthetic card transactions with a ~1% fraud rate (no data set is downloaded).

Twelve FP32 features per transaction, in FEATURE_NAMES order. Fraud is drawn from a stated rule plus noise:

    risk = -7.8 + 1.6*[card not present] + 1.3*[00:00-05:59] + 0.9*log1p(distance_km / 50)
           + 0.55*(transactions in the last hour - 1) + 1.1*[amount > 3x the cardholder's usual]
           + merchant category risk (0 for groceries .. 1.5 for online electronics / gift cards)
           + 0.8*[foreign] + normal(0, 0.7) noise
    fraud ~ Bernoulli(sigmoid(risk))

The constant -7.8 puts the fraud rate near 1%. `make_transactions(n, seed)` -> (features [n, 12] float32,
labels [n] int64); the same seed gives the same rows on every machine (numpy's PCG64).
"""

from __future__ import annotations

import numpy as np

FEATURE_NAMES = (
    "amount_usd",
    "log_amount",
    "merchant_category",  # 0..9, see MERCHANT_CATEGORIES
    "hour",  # 0..23, local time
    "is_night",  # 1 for 00:00-05:59
    "distance_from_home_km",
    "txn_count_last_hour",  # velocity: this card's transactions in the last hour, this one included
    "amount_last_hour_usd",
    "card_present",  # 1 for chip/swipe/tap, 0 for online/phone
    "amount_to_usual_ratio",  # amount / the cardholder's median amount
    "merchant_risk",  # the category's risk term in the rule above
    "is_foreign",
)
NUM_FEATURES = len(FEATURE_NAMES)
MERCHANT_CATEGORIES = (
    ("groceries", 0.0, 0.22), ("fuel", 0.2, 0.12), ("restaurants", 0.1, 0.16), ("pharmacy", 0.0, 0.06),
    ("travel", 0.6, 0.05), ("electronics", 1.0, 0.06), ("online_electronics", 1.5, 0.05),
    ("gift_cards", 1.5, 0.03), ("clothing", 0.4, 0.12), ("entertainment", 0.3, 0.13),
)  # (name, risk term, share of transactions); fmt: skip
RULE_INTERCEPT = -7.8


def make_transactions(num_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shares = np.array([c[2] for c in MERCHANT_CATEGORIES])
    category = rng.choice(len(MERCHANT_CATEGORIES), size=num_rows, p=shares / shares.sum())
    merchant_risk = np.array([c[1] for c in MERCHANT_CATEGORIES])[category]
    usual_amount = rng.lognormal(mean=3.4, sigma=0.6, size=num_rows)  # the cardholder's median, ~$30
    amount = usual_amount * rng.lognormal(mean=0.0, sigma=0.8, size=num_rows)
    hour = rng.choice(24, size=num_rows, p=_hour_shares())
    is_night = (hour < 6).astype(np.float64)
    card_present = (rng.random(num_rows) < np.where(category >= 6, 0.1, 0.75)).astype(np.float64)
    distance_km = rng.lognormal(mean=1.5, sigma=1.2, size=num_rows)
    is_foreign = (rng.random(num_rows) < 0.03).astype(np.float64)
    distance_km = np.where(is_foreign == 1, distance_km + rng.uniform(300, 3000, size=num_rows), distance_km)
    txn_count = 1 + rng.poisson(0.4, size=num_rows)
    amount_last_hour = amount + (txn_count - 1) * usual_amount * rng.lognormal(0.0, 0.5, size=num_rows)
    ratio = amount / usual_amount

    risk = (
        RULE_INTERCEPT
        + 1.6 * (1 - card_present)
        + 1.3 * is_night
        + 0.9 * np.log1p(distance_km / 50)
        + 0.55 * (txn_count - 1)
        + 1.1 * (ratio > 3)
        + merchant_risk
        + 0.8 * is_foreign
        + rng.normal(0.0, 0.7, size=num_rows)
    )
    labels = (rng.random(num_rows) < 1 / (1 + np.exp(-risk))).astype(np.int64)
    features = np.stack(
        [amount, np.log(amount), category, hour, is_night, distance_km, txn_count, amount_last_hour,
         card_present, ratio, merchant_risk, is_foreign],  # fmt: skip
        axis=1,
    ).astype(np.float32)
    return features, labels


def _hour_shares() -> np.ndarray:
    hours = np.arange(24)
    shares = 0.2 + np.exp(-((hours - 13) ** 2) / 30)  # a daytime peak, a quiet night
    return shares / shares.sum()
