#!/nestpress/busybox sh
# PID 1 of a distribution's kernel (harness/distro.py): load the modules every level needs (the image's own)
# and, except in L2, the variant's KVM modules with their parameters from the command line (insmod, unlike
# modprobe, does not read them there); then hand PID 1 to the agent ("$@": the interpreter and its
# arguments), on the shared root the command line names (rootfstype=, root=, rootflags=), or here (L2).
bb=/nestpress/busybox
$bb mount -t proc proc /proc
say() { echo "nestpress-init: $*" >/dev/console; }
arg() { for w in $($bb cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
params() { for w in $($bb cat /proc/cmdline); do case "$w" in "$1".*) echo "${w#*.}" ;; esac; done; }
for m in $($bb cat /nestpress/boot.order); do
  case "$m" in
  # the KVM PTP clock exists only where the parent's KVM pairs clocks (guest/clock.py): refused elsewhere
  ptp_kvm.ko) $bb insmod "/nestpress/boot/$m" 2>/dev/null || true ;;
  *) $bb insmod "/nestpress/boot/$m" || say "insmod $m failed" ;;
  esac
done
if [ "$(arg nestpress.level)" != l2 ]; then
  # shellcheck disable=SC2046 # one word per parameter
  $bb insmod /nestpress/kvm/kvm.ko $(params kvm) || say "insmod kvm.ko failed"
  # shellcheck disable=SC2046
  $bb insmod /nestpress/kvm/kvm-amd.ko $(params kvm_amd) 2>/dev/null ||
    $bb insmod /nestpress/kvm/kvm-intel.ko $(params kvm_intel) ||
    say "neither kvm-amd.ko nor kvm-intel.ko loaded (no SVM or VMX here?)"
fi
fstype=$(arg rootfstype)
if [ -n "$fstype" ]; then
  opts=ro
  [ -n "$(arg rootflags)" ] && opts="ro,$(arg rootflags)"
  $bb mkdir -p /newroot
  $bb mount -t "$fstype" -o "$opts" "$(arg root)" /newroot || { say "cannot mount the root: $fstype $(arg root)"; exit 1; }
  $bb umount /proc
  exec $bb switch_root /newroot "$@"
fi
$bb umount /proc
exec "$@"
