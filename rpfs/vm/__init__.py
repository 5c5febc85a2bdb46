"""Virtual machines: libvirt domains, their disks as the guest sees them (NBD), the guest agent, the backup
API's jobs and checkpoints. Below backup and restore, beside the vault; imports only host and errors."""
