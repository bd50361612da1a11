from services.roster.adapters.orm import metadata
from services.runtime.migrate import run_env

run_env(metadata, "roster")
