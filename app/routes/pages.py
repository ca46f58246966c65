"""Operator-facing pages. `/` says the proxy runs and shows no secrets."""

from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    from app import __version__

    return render_template("index.html", version=__version__)
