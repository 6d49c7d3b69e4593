"""Running as a system service: systemd notification, live reload, logging set-up."""
