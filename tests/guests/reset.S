# reset: counts its boots and resets the machine through the i8042 (0xFE to port 0x64, the way
# `reboot=k` does) until its third boot, which powers off. minivmm reboots in process on a
# reset, so one run prints
#     boot 1: resetting through the i8042
#     boot 2: resetting through the i8042
#     boot 3: powering off
# and ends with status 0; under --no-reboot it ends at the first reset, also with status 0.
#
# The count lives in a RAM word outside the image (RAM keeps its contents across a reset, as
# on QEMU; a fresh VM's RAM is zero). Each boot also checks what the reset must have rewritten:
# its own .data (the image is loaded again) and the PVH start info EBX points at.
	.code32
	.include "common.inc"

	.set BOOT_COUNT_ADDR, 0x200000	# 2 MiB: RAM above this image, below anything minivmm writes
	.set BOOT_COUNT_MAGIC, 0x544f4f42	# "BOOT"
	.set BOOT_LIMIT, 3
	.set XEN_HVM_START_MAGIC, 0x336ec578
	.set DATA_PRISTINE, 0x600dda7a

	program_start
	call uart_init
	# .data as loaded: a boot that finds it changed ran on the last boot's image.
	cmpl $DATA_PRISTINE, pristine
	je 1f
	mov $msg_stale_data, %esi
	call puts
1:	movl $0, pristine
	mov start_info, %ebx
	cmpl $XEN_HVM_START_MAGIC, (%ebx)
	je 2f
	mov $msg_no_start_info, %esi
	call puts
2:	mov $BOOT_COUNT_ADDR, %edi
	cmpl $BOOT_COUNT_MAGIC, (%edi)
	je 3f
	movl $BOOT_COUNT_MAGIC, (%edi)
	movl $0, 4(%edi)
3:	incl 4(%edi)
	mov $msg_boot, %esi
	call puts
	mov 4(%edi), %eax
	call putdec
	cmp $BOOT_LIMIT, %eax
	jae 4f
	mov $msg_resetting, %esi
	call puts
	outb I8042_COMMAND_PORT, I8042_RESET
	jmp halt_forever
4:	mov $msg_poweroff, %esi
	call puts
	jmp poweroff

	.section .rodata
msg_boot:	.asciz "boot "
msg_resetting:	.asciz ": resetting through the i8042\n"
msg_poweroff:	.asciz ": powering off\n"
msg_stale_data:	.asciz "FAIL .data not reloaded\n"
msg_no_start_info:	.asciz "FAIL no PVH start info\n"

	.data
	.balign 4
pristine:	.long DATA_PRISTINE
