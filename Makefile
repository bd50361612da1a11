# The two commands a newcomer needs: `make up` and `make test`.
.PHONY: up test bench install

up:            ## install, then run the whole platform on the embedded broker and SQLite files
	./scripts/dev.sh up $(ARGS)

test:          ## install, then run lint, the schema check and every test
	./scripts/dev.sh test $(ARGS)

bench:         ## install, then run the throughput benchmark (prints figures)
	./scripts/dev.sh bench $(ARGS)

install:
	./scripts/dev.sh install
