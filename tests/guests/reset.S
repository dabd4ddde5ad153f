# reset: prints a line, then pulses the reset line through the i8042 (0xFE to port 0x64), the
# way `reboot=k` does. minivmm ends with status 0 (a guest reboot ends the VM by default).
	.code32
	.include "common.inc"

	program_start
	call uart_init
	mov $msg, %esi
	call puts
	outb I8042_COMMAND_PORT, I8042_RESET
	jmp halt_forever

	.section .rodata
msg:	.asciz "resetting through the i8042\n"
