from .view import Profile, list_profiles, open_profile
