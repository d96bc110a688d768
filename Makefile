# The two commands a new user needs. Both create ./.venv when missing (scripts/setup.sh).
.PHONY: demo test tiny setup lint

setup:
	bash scripts/setup.sh

demo: setup            ## set up, then run the whole pipeline on the demo preset (CPU, about 15 min)
	.venv/bin/rlhf run --preset demo

tiny: setup            ## the whole pipeline on the tiny preset (about 3 min)
	.venv/bin/rlhf run --preset tiny

test: setup            ## set up, then run the test suite (slow and system tests included)
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .
