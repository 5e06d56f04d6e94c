import os
import sys

# The recipes are scripts in recipes/, imported by the tests as top-level modules.
RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
sys.path.insert(0, os.path.abspath(RECIPES))
