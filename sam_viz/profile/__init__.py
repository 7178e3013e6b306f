"""Corpus profiles (issue 14): the reader side; the writer (build_profile) joins it here."""
from .view import Profile, list_profiles, open_profile
