#!/usr/bin/env bash
# Add or update a device's MQTT credentials. Usage: add-device.sh DEVICE_ID [PASSWD_FILE]
# Reads the password from stdin so it never shows in `ps` or shell history.
set -euo pipefail
id="${1:?usage: add-device.sh DEVICE_ID [PASSWD_FILE]}"
file="${2:-/etc/mosquitto/edgefleet/passwd}"
[[ "$id" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || { echo "invalid device id: $id" >&2; exit 2; }
read -r -s -p "password for $id: " pw; echo
touch "$file"; chmod 0600 "$file"
mosquitto_passwd -b "$file" "$id" "$pw"
echo "added $id to $file; reload mosquitto (systemctl reload mosquitto)"
