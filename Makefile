# Builds and installs trail for distributions other than Debian (Debian: `make deb`, see README "Installing").
#   make                      release build of the daemon, the command-line tool and the first-party plugins
#   make install              install under PREFIX (default /usr/local), into DESTDIR when packaging
#   make deb                  the Debian package, with cargo-deb, in target/debian/
#   make install-sdk          only the plugin SDK, under DATADIR/trail/sdk (install does this too)
# The installed unit, configuration and snippets name the installed paths (PREFIX, SYSCONFDIR, LOCALSTATEDIR).

PREFIX        ?= /usr/local
SYSCONFDIR    ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
LOCALSTATEDIR ?= /var
RUNSTATEDIR   ?= /run
BINDIR        ?= $(PREFIX)/bin
LIBDIR        ?= $(PREFIX)/lib
DATADIR       ?= $(PREFIX)/share
UNITDIR       ?= $(LIBDIR)/systemd/system
SYSUSERSDIR   ?= $(LIBDIR)/sysusers.d
TMPFILESDIR   ?= $(LIBDIR)/tmpfiles.d
PLUGINDIR     ?= $(LIBDIR)/trail/plugins
# The plugin SDK: the API crate's source, the plugin test kit and the sink template (what `trail plugin new` uses).
SDKDIR        ?= $(DATADIR)/trail/sdk
DESTDIR       ?=
CARGO         ?= cargo
# release, or debug to install what `cargo build` made (the test suite does this)
PROFILE       ?= release
PLUGINS       := trail-sink-webhook trail-sink-syslog trail-sink-postgres trail-sink-nats
TARGET_DIR    ?= target

PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)
OUT          := $(TARGET_DIR)/$(PROFILE)
# The repository's files name the Debian layout; installing elsewhere rewrites those paths.
REWRITE := sed -e 's|/usr/bin/|$(BINDIR)/|g' -e 's|/usr/lib/trail/plugins|$(PLUGINDIR)|g' \
	-e 's|/etc/trail|$(SYSCONFDIR)/trail|g' -e 's|/var/lib/trail|$(LOCALSTATEDIR)/lib/trail|g' \
	-e 's|/run/trail|$(RUNSTATEDIR)/trail|g'

# The SDK's manifests name each other by relative paths inside the repository; inside the SDK the crates lie side
# by side (plugin-api/, testkit/, sink-template/).
SDK_REWRITE := sed -e 's|path = "\.\./\.\./plugin-api"|path = "../plugin-api"|' \
	-e 's|path = "\.\./\.\./plugins/testkit"|path = "../testkit"|' -e 's|path = "\.\./plugins/testkit"|path = "../testkit"|'
# install_sdk DIR: lays the SDK out in DIR.
define install_sdk
	install -d $(1)/plugin-api/src $(1)/testkit/src $(1)/sink-template/src $(1)/sink-template/tests
	$(SDK_REWRITE) plugin-api/Cargo.toml > $(1)/plugin-api/Cargo.toml
	install -m 0644 plugin-api/README.md plugin-api/GUIDE.md $(1)/plugin-api/
	install -m 0644 plugin-api/src/*.rs $(1)/plugin-api/src/
	$(SDK_REWRITE) plugins/testkit/Cargo.toml > $(1)/testkit/Cargo.toml
	install -m 0644 plugins/testkit/src/*.rs $(1)/testkit/src/
	$(SDK_REWRITE) examples/sink-template/Cargo.toml > $(1)/sink-template/Cargo.toml
	install -m 0644 examples/sink-template/README.md $(1)/sink-template/
	install -m 0644 examples/sink-template/src/*.rs $(1)/sink-template/src/
	install -m 0644 examples/sink-template/tests/*.rs $(1)/sink-template/tests/
	chmod 0644 $(1)/plugin-api/Cargo.toml $(1)/testkit/Cargo.toml $(1)/sink-template/Cargo.toml
endef

.PHONY: all build install install-sdk sdk uninstall deb

all: build

build:
	$(CARGO) build $(PROFILE_FLAG) -p trail $(addprefix -p ,$(PLUGINS))

install: install-sdk
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(PLUGINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSCONFDIR)/trail/event-types $(DESTDIR)$(DATADIR)/doc/trail \
		$(DESTDIR)$(DATADIR)/trail
	install -m 0755 $(OUT)/traild $(OUT)/trail $(DESTDIR)$(BINDIR)/
	for p in $(subst -,_,$(PLUGINS)); do install -m 0644 $(OUT)/lib$$p.so $(DESTDIR)$(PLUGINDIR)/; done
	$(REWRITE) systemd/trail.service > $(DESTDIR)$(UNITDIR)/trail.service
	for u in trail.socket trail-admin.socket; do $(REWRITE) systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u; done
	$(REWRITE) systemd/trail.sysusers > $(DESTDIR)$(SYSUSERSDIR)/trail.conf
	$(REWRITE) systemd/trail.tmpfiles > $(DESTDIR)$(TMPFILESDIR)/trail.conf
	chmod 0644 $(DESTDIR)$(UNITDIR)/trail.service $(DESTDIR)$(UNITDIR)/trail.socket \
		$(DESTDIR)$(UNITDIR)/trail-admin.socket $(DESTDIR)$(SYSUSERSDIR)/trail.conf $(DESTDIR)$(TMPFILESDIR)/trail.conf
	# The configuration is the administrator's: never overwritten once installed.
	test -e $(DESTDIR)$(SYSCONFDIR)/trail/trail.yaml || \
		{ $(REWRITE) systemd/trail.yaml > $(DESTDIR)$(SYSCONFDIR)/trail/trail.yaml && \
		  chmod 0640 $(DESTDIR)$(SYSCONFDIR)/trail/trail.yaml; }
	for f in event-types/*.yml; do case $$(basename $$f) in trail_*) ;; *) \
		test -e $(DESTDIR)$(SYSCONFDIR)/trail/$$f || install -m 0644 $$f $(DESTDIR)$(SYSCONFDIR)/trail/event-types/;; \
		esac; done
	install -m 0644 README.md ARCHITECTURE.md $(DESTDIR)$(DATADIR)/doc/trail/
	install -m 0644 systemd/trail.rules.yml $(DESTDIR)$(DATADIR)/trail/

install-sdk:
	$(call install_sdk,$(DESTDIR)$(SDKDIR))

# The SDK staged for the Debian package (its assets name target/sdk/).
sdk:
	rm -rf $(TARGET_DIR)/sdk
	$(call install_sdk,$(TARGET_DIR)/sdk)

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/traild $(DESTDIR)$(BINDIR)/trail $(DESTDIR)$(UNITDIR)/trail.service \
		$(DESTDIR)$(UNITDIR)/trail.socket $(DESTDIR)$(UNITDIR)/trail-admin.socket \
		$(DESTDIR)$(SYSUSERSDIR)/trail.conf $(DESTDIR)$(TMPFILESDIR)/trail.conf $(DESTDIR)$(DATADIR)/trail/trail.rules.yml
	rm -rf $(DESTDIR)$(PLUGINDIR) $(DESTDIR)$(DATADIR)/doc/trail $(DESTDIR)$(SDKDIR)

deb: sdk
	$(CARGO) build --release -p trail $(addprefix -p ,$(PLUGINS))
	$(CARGO) deb --no-build --strip -p trail
